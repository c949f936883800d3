"""The registry service on a real gRPC server (port 0) and a real Redis: models, streamed
uploads and downloads of real TorchScript artifacts, checksum and corruption handling,
compare-and-set aliases, restart, and the repair of a flushed Redis."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 16])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)
UPLOAD_CHUNK_BYTES = 4096
DOWNLOAD_CHUNK_BYTES = 5000


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(16, 128)
        self.out = torch.nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


_ARTIFACTS: dict[int, bytes] = {}


def torchscript_artifact(seed: int = 0) -> bytes:
    """A real TorchScript archive of a tiny MLP (about 10 KB), one per seed."""
    if seed not in _ARTIFACTS:
        torch.manual_seed(seed)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(TinyMLP()), buffer)
        _ARTIFACTS[seed] = buffer.getvalue()
    return _ARTIFACTS[seed]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fixtures -------------------------------------------------------------------------------

StartRegistry = Callable[..., Awaitable[RegistryApp]]


@pytest.fixture
async def start_registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """Factory: start a registry on port 0 over `tmp_path/registry`; every one is closed after
    the test. Keyword arguments override settings."""
    apps: list[RegistryApp] = []

    async def start(**overrides: Any) -> RegistryApp:
        values: dict[str, Any] = {
            "server": ServerSettings(port=0, drain_grace_s=1.0),
            "redis": redis_settings,
            "data_dir": tmp_path / "registry",
            "download_chunk_bytes": DOWNLOAD_CHUNK_BYTES,
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
async def connect() -> AsyncIterator[Callable[[RegistryApp], RegistryServiceAsyncStub]]:
    """Factory: a stub on a fresh channel to a registry; channels are closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(app: RegistryApp) -> RegistryServiceAsyncStub:
        channel = grpc.aio.insecure_channel(app.address)
        channels.append(channel)
        return RegistryServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.fixture
async def app(start_registry: StartRegistry) -> RegistryApp:
    return await start_registry()


@pytest.fixture
def stub(
    app: RegistryApp, connect: Callable[[RegistryApp], RegistryServiceAsyncStub]
) -> RegistryServiceAsyncStub:
    return connect(app)


# -- helpers --------------------------------------------------------------------------------


async def upload_requests(
    model: str,
    data: bytes,
    *,
    sha256: str | None = None,
    fmt: registry_pb2.ArtifactFormat = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    signature: tensor_pb2.Signature = SIGNATURE,
    request_id: str = "",
) -> AsyncIterator[pb.UploadModelVersionRequest]:
    yield pb.UploadModelVersionRequest(
        metadata=pb.UploadModelVersionMetadata(
            model=model,
            format=fmt,
            sha256=sha256_of(data) if sha256 is None else sha256,
            signature=signature,
            description="a tiny MLP",
            labels={"dataset": "synthetic"},
            metrics={"accuracy": 0.5},
            request_id=request_id,
        )
    )
    for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
        yield pb.UploadModelVersionRequest(chunk=data[start : start + UPLOAD_CHUNK_BYTES])


async def upload(
    stub: RegistryServiceAsyncStub, model: str, data: bytes, **kwargs: Any
) -> registry_pb2.ModelVersion:
    response = await stub.UploadModelVersion(upload_requests(model, data, **kwargs))
    return response.model_version


async def download(
    stub: RegistryServiceAsyncStub, model: str, version: int
) -> tuple[bytes, list[pb.DownloadModelVersionResponse]]:
    messages = [
        m
        async for m in stub.DownloadModelVersion(pb.DownloadModelVersionRequest(model=model, version=version))
    ]
    return b"".join(m.chunk for m in messages), messages


async def set_alias(
    stub: RegistryServiceAsyncStub,
    model: str,
    alias: str,
    version: int,
    expected: int | None = None,
    **kw: Any,
) -> pb.SetAliasResponse:
    request = pb.SetAliasRequest(model=model, alias=alias, version=version, **kw)
    if expected is not None:
        request.expected_version = expected
    return await stub.SetAlias(request)


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status")


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def stored_files(app: RegistryApp) -> tuple[list[Path], list[Path]]:
    """(artifacts under sha256/, leftovers under tmp/)."""
    root = app.settings.resolved_artifacts_dir
    return (
        sorted(p for p in (root / "sha256").rglob("*") if p.is_file()),
        sorted((root / "tmp").iterdir()),
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- models ---------------------------------------------------------------------------------


async def test_create_get_and_list_models(stub: RegistryServiceAsyncStub) -> None:
    created = await stub.CreateModel(pb.CreateModelRequest(name="mlp", description="an MLP"))
    assert created.model.name == "mlp" and created.model.description == "an MLP"
    assert created.model.latest_version == 0 and created.model.create_time.seconds > 0
    await stub.CreateModel(pb.CreateModelRequest(name="classifier"))

    got = await stub.GetModel(pb.GetModelRequest(name="mlp"))
    assert got.model == created.model
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in listed.models] == ["classifier", "mlp"]

    err = await failure(stub.GetModel(pb.GetModelRequest(name="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "MODEL_NOT_FOUND"
    err = await failure(stub.CreateModel(pb.CreateModelRequest(name="Bad Name")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["name"]


async def test_duplicate_create_is_already_exists_unless_a_retry(stub: RegistryServiceAsyncStub) -> None:
    first = await stub.CreateModel(pb.CreateModelRequest(name="mlp", request_id="req-1"))
    err = await failure(stub.CreateModel(pb.CreateModelRequest(name="mlp")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and error_info(err).reason == "ALREADY_EXISTS"
    # A retry of the same call (same request id) is answered as the first one was.
    retried = await stub.CreateModel(pb.CreateModelRequest(name="mlp", request_id="req-1"))
    assert retried.model == first.model


# -- uploads and downloads ------------------------------------------------------------------


async def test_upload_in_chunks_then_download_gives_identical_bytes(stub: RegistryServiceAsyncStub) -> None:
    data = torchscript_artifact()
    assert len(data) > 2 * max(UPLOAD_CHUNK_BYTES, DOWNLOAD_CHUNK_BYTES)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))

    version = await upload(stub, "mlp", data)
    assert (version.model, version.version) == ("mlp", 1)
    assert version.sha256 == sha256_of(data) and version.size_bytes == len(data)
    assert version.format == registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
    assert version.state == registry_pb2.MODEL_VERSION_STATE_ACTIVE
    assert version.signature == SIGNATURE
    assert dict(version.labels) == {"dataset": "synthetic"} and dict(version.metrics) == {"accuracy": 0.5}

    got = await stub.GetModelVersion(pb.GetModelVersionRequest(model="mlp", version=1))
    assert got.model_version == version

    body, messages = await download(stub, "mlp", 1)
    assert body == data
    assert len(messages) > 1
    assert (messages[0].sha256, messages[0].size_bytes) == (version.sha256, len(data))
    assert all(m.sha256 == "" and m.size_bytes == 0 for m in messages[1:])
    # What comes back is a working TorchScript program.
    loaded = torch.jit.load(io.BytesIO(body))
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), torch.jit.load(io.BytesIO(data))(x))

    second = await upload(stub, "mlp", torchscript_artifact(seed=1))
    assert second.version == 2
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="mlp"))
    assert [v.version for v in listed.model_versions] == [1, 2]
    assert (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model.latest_version == 2


async def test_upload_with_wrong_sha256_stores_nothing(
    app: RegistryApp, stub: RegistryServiceAsyncStub
) -> None:
    data = torchscript_artifact()
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))

    err = await failure(upload(stub, "mlp", data, sha256=sha256_of(data + b"x")))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert info.reason == "CHECKSUM_MISMATCH"
    assert info.metadata["actual_sha256"] == sha256_of(data)
    assert bad_fields(err) == ["metadata.sha256"]
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="mlp"))
    assert list(listed.model_versions) == []
    assert (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model.latest_version == 0
    assert stored_files(app) == ([], [])


async def test_upload_to_unknown_model_is_not_found(app: RegistryApp, stub: RegistryServiceAsyncStub) -> None:
    err = await failure(upload(stub, "ghost", torchscript_artifact()))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "MODEL_NOT_FOUND"
    assert stored_files(app) == ([], [])


def _pickle_artifact() -> bytes:
    buffer = io.BytesIO()
    torch.save(TinyMLP().state_dict(), buffer)
    return buffer.getvalue()


BAD_UPLOADS: dict[str, tuple[dict[str, Any], str]] = {
    "no format": ({"fmt": registry_pb2.ARTIFACT_FORMAT_UNSPECIFIED}, "metadata.format"),
    "bad sha256": ({"sha256": "abc"}, "metadata.sha256"),
    "no outputs": (
        {"signature": tensor_pb2.Signature(inputs=SIGNATURE.inputs)},
        "metadata.signature.outputs",
    ),
    "no dtype": (
        {
            "signature": tensor_pb2.Signature(
                inputs=[tensor_pb2.TensorSpec(name="input", shape=[-1, 16])], outputs=SIGNATURE.outputs
            )
        },
        "metadata.signature.inputs[0].data_type",
    ),
    "no bytes": ({"data": b""}, "chunk"),
    "a pickle": ({"data": "pickle"}, "metadata.format"),
    "wrong format": ({"fmt": registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT}, "metadata.format"),
}


async def test_upload_refuses_bad_metadata_and_stores_nothing(
    app: RegistryApp, stub: RegistryServiceAsyncStub
) -> None:
    # One registry for every case: each start and drain costs about half a second.
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    for case, (kwargs, field) in BAD_UPLOADS.items():
        kwargs = dict(kwargs)
        data = kwargs.pop("data", torchscript_artifact())
        if data == "pickle":
            data = _pickle_artifact()
        err = await failure(upload(stub, "mlp", data, **kwargs))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.details())
        assert bad_fields(err) == [field], case
        assert stored_files(app) == ([], []), case
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="mlp"))
    assert list(listed.model_versions) == []


async def test_upload_must_start_with_metadata(stub: RegistryServiceAsyncStub) -> None:
    async def chunks_only() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(chunk=b"abc")

    err = await failure(stub.UploadModelVersion(chunks_only()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["metadata"]


async def test_upload_over_the_size_limit_is_too_large(
    start_registry: StartRegistry, connect: Callable[[RegistryApp], RegistryServiceAsyncStub]
) -> None:
    app = await start_registry(max_artifact_bytes=5000)
    stub = connect(app)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    err = await failure(upload(stub, "mlp", torchscript_artifact()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "TOO_LARGE"
    assert stored_files(app) == ([], [])


async def test_retried_upload_with_the_same_request_id_is_one_version(stub: RegistryServiceAsyncStub) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    first = await upload(stub, "mlp", torchscript_artifact(), request_id="up-1")
    again = await upload(stub, "mlp", torchscript_artifact(), request_id="up-1")
    assert again == first
    err = await failure(upload(stub, "mlp", torchscript_artifact(seed=1), request_id="up-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["metadata.request_id"]


async def test_abandoned_upload_leaves_nothing(app: RegistryApp, stub: RegistryServiceAsyncStub) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    data = torchscript_artifact()
    sent_some = asyncio.Event()

    async def stalls_halfway() -> AsyncIterator[pb.UploadModelVersionRequest]:
        requests = upload_requests("mlp", data)
        for _ in range(3):
            yield await anext(requests)
        sent_some.set()
        await asyncio.Event().wait()  # the client goes quiet, then gives up

    call = stub.UploadModelVersion(stalls_halfway())
    await sent_some.wait()
    await eventually(lambda: asyncio.sleep(0, result=bool(stored_files(app)[1])))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: asyncio.sleep(0, result=stored_files(app) == ([], [])))
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="mlp"))
    assert list(listed.model_versions) == []


async def test_corrupted_artifact_is_refused_with_data_loss(
    app: RegistryApp, stub: RegistryServiceAsyncStub
) -> None:
    data = torchscript_artifact()
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    await upload(stub, "mlp", data)
    [path], _ = stored_files(app)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(damaged))

    chunks: list[pb.DownloadModelVersionResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in stub.DownloadModelVersion(
            pb.DownloadModelVersionRequest(model="mlp", version=1)
        ):
            chunks.append(message)
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_info(caught.value).reason == "ARTIFACT_CORRUPT"
    assert chunks == []  # not one byte of the damaged file went out

    # Uploading the same artifact again replaces the damaged copy.
    await upload(stub, "mlp", data)
    body, _ = await download(stub, "mlp", 1)
    assert body == data

    path.unlink()
    err = await failure(download(stub, "mlp", 1))
    assert err.code() == grpc.StatusCode.DATA_LOSS


async def test_download_of_unknown_version_is_not_found(stub: RegistryServiceAsyncStub) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    err = await failure(download(stub, "mlp", 7))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "VERSION_NOT_FOUND"


# -- aliases --------------------------------------------------------------------------------


async def test_set_alias_compare_and_set_lands_in_redis(
    stub: RegistryServiceAsyncStub, store: CoordinationStore
) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    await upload(stub, "mlp", torchscript_artifact())
    await upload(stub, "mlp", torchscript_artifact(seed=1))

    created = await set_alias(stub, "mlp", "production", 1, expected=0, reason="first release")
    assert (created.alias.name, created.alias.version, created.previous_version, created.epoch) == (
        "production",
        1,
        0,
        1,
    )
    assert await store.get_aliases("mlp") == ({"production": 1}, 1)

    err = await failure(set_alias(stub, "mlp", "production", 2, expected=0))
    assert err.code() == grpc.StatusCode.ABORTED
    assert error_info(err).reason == "CONFLICT" and error_info(err).metadata["current_version"] == "1"
    assert "points at version 1" in (err.details() or "")

    moved = await set_alias(stub, "mlp", "production", 2, expected=1, request_id="move-1")
    assert (moved.previous_version, moved.epoch) == (1, 2)
    # A retry of the same move is answered as the first was, and moves nothing.
    assert await set_alias(stub, "mlp", "production", 2, expected=1, request_id="move-1") == moved
    await set_alias(stub, "mlp", "canary", 1)  # unset expected_version: move whatever it is
    assert await store.get_aliases("mlp") == ({"production": 2, "canary": 1}, 3)

    model = (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model
    assert {a.name: a.version for a in model.aliases} == {"canary": 1, "production": 2}

    err = await failure(set_alias(stub, "mlp", "production", 9))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "VERSION_NOT_FOUND"
    err = await failure(set_alias(stub, "mlp", "Prod!", 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["alias"]
    err = await failure(set_alias(stub, "ghost", "production", 1))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_set_alias_exactly_one_wins(
    stub: RegistryServiceAsyncStub, store: CoordinationStore
) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    for seed in range(3):
        await upload(stub, "mlp", torchscript_artifact(seed))
    await set_alias(stub, "mlp", "production", 1, expected=0)

    results = await asyncio.gather(
        *(set_alias(stub, "mlp", "production", 2 + i % 2, expected=1) for i in range(20)),
        return_exceptions=True,
    )

    winners = [r for r in results if isinstance(r, pb.SetAliasResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 19, results
    target = winners[0].alias.version
    assert (winners[0].previous_version, winners[0].epoch) == (1, 2)
    assert {e.code() for e in losers} == {grpc.StatusCode.ABORTED}
    assert {error_info(e).metadata["current_version"] for e in losers} == {str(target)}
    model = (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model
    assert [(a.name, a.version) for a in model.aliases] == [("production", target)]
    # One move, one epoch: no lost update and no phantom one.
    assert await store.get_aliases("mlp") == ({"production": target}, 2)


# -- durability and recovery ----------------------------------------------------------------


async def test_restart_keeps_everything(
    start_registry: StartRegistry, connect: Callable[[RegistryApp], RegistryServiceAsyncStub]
) -> None:
    data = torchscript_artifact()
    first = await start_registry()
    stub = connect(first)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp", description="an MLP"))
    version = await upload(stub, "mlp", data)
    await set_alias(stub, "mlp", "production", 1, expected=0)
    before = (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model
    await first.aclose()

    second = await start_registry()
    stub = connect(second)
    assert (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model == before
    assert (
        await stub.GetModelVersion(pb.GetModelVersionRequest(model="mlp", version=1))
    ).model_version == version
    assert (await download(stub, "mlp", 1))[0] == data
    # Numbering and epochs carry on where they were.
    assert (await upload(stub, "mlp", torchscript_artifact(seed=1))).version == 2
    assert (await set_alias(stub, "mlp", "production", 2, expected=1)).epoch == 2


async def test_flushall_is_repaired_by_the_resync(
    start_registry: StartRegistry,
    connect: Callable[[RegistryApp], RegistryServiceAsyncStub],
    store: CoordinationStore,
) -> None:
    app = await start_registry(redis_resync_interval_s=0.05)
    stub = connect(app)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    await upload(stub, "mlp", torchscript_artifact())
    await set_alias(stub, "mlp", "production", 1, expected=0)
    await set_alias(stub, "mlp", "canary", 1, expected=0)
    expected = ({"production": 1, "canary": 1}, 2)
    assert await store.get_aliases("mlp") == expected

    await store.client.flushall()

    async def restored() -> bool:
        return await store.get_aliases("mlp") == expected

    await eventually(restored)


async def test_redis_ahead_of_the_registry_is_rewritten(
    start_registry: StartRegistry,
    connect: Callable[[RegistryApp], RegistryServiceAsyncStub],
    store: CoordinationStore,
) -> None:
    app = await start_registry(redis_resync_interval_s=0.05)
    stub = connect(app)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    await upload(stub, "mlp", torchscript_artifact())
    await set_alias(stub, "mlp", "production", 1, expected=0)
    # As if Redis outlived a registry database restored from an older backup.
    await store.apply_aliases("mlp", {"production": 7, "stale": 3}, epoch=100)

    async def rewritten() -> bool:
        return await store.get_aliases("mlp") == ({"production": 1}, 101)

    await eventually(rewritten)
    # The next move goes live too: the registry's epoch moved past Redis's.
    await set_alias(stub, "mlp", "canary", 1, expected=0)
    assert await store.get_aliases("mlp") == ({"production": 1, "canary": 1}, 102)


async def test_registry_joins_and_leaves_the_cluster(
    start_registry: StartRegistry, store: CoordinationStore
) -> None:
    app = await start_registry()
    [record] = await store.list_services()
    assert (record.kind, record.address, record.id) == ("registry", app.address, app.service_id)
    await app.aclose()
    assert await store.list_services() == []


async def test_the_registry_works_while_redis_is_down(
    start_registry: StartRegistry, connect: Callable[[RegistryApp], RegistryServiceAsyncStub]
) -> None:
    # Nothing listens on port 1: every Redis call is refused at once.
    app = await start_registry(
        redis=RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=0.2, retries=0)
    )
    stub = connect(app)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
    await upload(stub, "mlp", torchscript_artifact())
    # The move is committed in the registry; it goes live when Redis is back (see the resync tests).
    moved = await set_alias(stub, "mlp", "production", 1, expected=0)
    assert (moved.alias.version, moved.epoch) == (1, 1)
    model = (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model
    assert [(a.name, a.version) for a in model.aliases] == [("production", 1)]
    assert (await download(stub, "mlp", 1))[0] == torchscript_artifact()

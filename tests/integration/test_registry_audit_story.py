"""What the audit log and the alias history say, on a real registry (port 0, real Redis, real
SQLite), with access control off and on: SetDeployment entries carry the full field diff,
an update mask changes only the fields it names, alias moves are typed, and the monitor, the
demo and the load tests act under their own names (a labelled claim with access off, their
service principal with access on), so `audit --actor monitor` finds the monitor's actions."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelyard.access.client import bearer
from modelyard.access.keys import ServiceTokens, new_key_token
from modelyard.settings import AccessSettings, RedisSettings, ServerSettings, load_settings
from modelyard.tls import open_channel
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli.local_cluster import tool_token
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

MODEL = "story"
SECRET = b"s" * 32
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)
_ARTIFACT: list[bytes] = []


def artifact() -> bytes:
    """A real TorchScript archive (the registry inspects what it stores), made once."""
    if not _ARTIFACT:
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), buffer)
        _ARTIFACT.append(buffer.getvalue())
    return _ARTIFACT[0]


StartRegistry = Callable[..., Awaitable[RegistryApp]]
OpenStub = Callable[..., "RegistryServiceAsyncStub"]


@pytest.fixture
async def start_registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[StartRegistry]:
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
async def open_stub() -> AsyncIterator[OpenStub]:
    """Factory: a stub on a channel built the way the cluster's clients build theirs
    (`open_channel`, a bearer token, a claimed client name); channels closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def make(
        address: str, *, token: str | None = None, client: str | None = None
    ) -> RegistryServiceAsyncStub:
        channel = open_channel(address, None, interceptors=bearer(token), client=client)
        channels.append(channel)
        return RegistryServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def model_with_versions(stub: RegistryServiceAsyncStub, count: int) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    data = artifact()

    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=MODEL,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
            )
        )
        yield pb.UploadModelVersionRequest(chunk=data)

    for _ in range(count):
        await stub.UploadModelVersion(requests())


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def bad_field(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, err.details()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {err.details()}")


def split_request(split: dict[str, int], *, request_id: str = "", epoch: int = 0) -> pb.SetDeploymentRequest:
    # What the monitor's stepwise canary sends (with the mask it should send, see docs/registry.md).
    return pb.SetDeploymentRequest(
        model=MODEL,
        deployment=registry_pb2.Deployment(traffic_split=split),
        request_id=request_id,
        expected_epoch=epoch,
        update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
    )


# -- access control off ---------------------------------------------------------------------


async def test_with_access_off_the_monitor_is_found_by_its_claimed_name_and_every_change_is_told(
    start_registry: StartRegistry, open_stub: OpenStub
) -> None:
    registry = await start_registry()
    operator = open_stub(registry.address, client="cli")
    monitor = open_stub(registry.address, client="monitor")
    stranger = open_stub(registry.address)  # claims nothing
    await model_with_versions(operator, 2)
    await operator.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    await operator.SetAlias(pb.SetAliasRequest(model=MODEL, alias="canary", version=2))

    # The operator's full deployment, then the monitor's canary steps change only the split.
    await operator.SetDeployment(
        pb.SetDeploymentRequest(model=MODEL, deployment=registry_pb2.Deployment(replicas=2, device="cpu"))
    )
    current = (await monitor.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    step = await monitor.SetDeployment(
        split_request(
            {"production": 90, "canary": 10},
            request_id=f"monitor-canary-{MODEL}-v2-step1",
            epoch=current.epoch,
        )
    )
    assert (step.deployment.replicas, step.deployment.device) == (2, "cpu")  # kept
    await monitor.SetAlias(
        pb.SetAliasRequest(
            model=MODEL,
            alias="canary",
            version=1,
            expected_version=2,
            reason="canary analysis: error rate 20% over stable",
            request_id=f"monitor-canary-{MODEL}-canary-2-1",
            kind=registry_pb2.ALIAS_MOVE_KIND_CANARY_ROLLBACK,
        )
    )
    await monitor.SetDeployment(split_request({}, request_id=f"monitor-canary-{MODEL}-v2-rollback"))
    await stranger.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="canary"))

    by_monitor = (await operator.ListAuditEntries(pb.ListAuditEntriesRequest(actor="monitor"))).entries
    assert [(e.method, e.request_id) for e in by_monitor] == [
        ("SetDeployment", f"monitor-canary-{MODEL}-v2-rollback"),
        ("SetAlias", f"monitor-canary-{MODEL}-canary-2-1"),
        ("SetDeployment", f"monitor-canary-{MODEL}-v2-step1"),
    ]
    claimed = re.compile(r"monitor \(claimed; access control off\) at ipv4:127\.0\.0\.1:\d+")
    assert all(claimed.fullmatch(e.actor) for e in by_monitor), [e.actor for e in by_monitor]
    rollback, canary_move, first_step = by_monitor
    assert first_step.target == "deployment [traffic_split]"
    assert re.fullmatch(
        r"traffic_split \{\} -> \{canary: 10, production: 90\}; placed versions \[1, 2\] \(epoch \d+\)",
        first_step.message,
    ), first_step.message
    assert rollback.message.startswith("traffic_split {canary: 10, production: 90} -> {}; placed versions")
    assert canary_move.message.endswith("; declared a canary rollback")

    everyone = (await operator.ListAuditEntries(pb.ListAuditEntriesRequest(method="SetDeployment"))).entries
    operators = [e for e in everyone if e.actor.startswith("cli (claimed; access control off) at ")]
    assert [e.message.split("; placed")[0] for e in operators] == ['replicas 0 -> 2; device "" -> "cpu"']
    anonymous = (await operator.ListAuditEntries(pb.ListAuditEntriesRequest(actor="anonymous"))).entries
    assert [e.method for e in anonymous] == ["RollbackAlias"]
    assert anonymous[0].actor.startswith("anonymous (access control off) at ipv4:")

    history = (await operator.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL))).entries
    assert [(e.alias, e.kind, e.to_version) for e in history] == [
        ("canary", registry_pb2.ALIAS_MOVE_KIND_ROLLBACK, 2),
        ("canary", registry_pb2.ALIAS_MOVE_KIND_CANARY_ROLLBACK, 1),
        ("canary", registry_pb2.ALIAS_MOVE_KIND_SET, 2),
        ("production", registry_pb2.ALIAS_MOVE_KIND_SET, 1),
    ]
    assert claimed.fullmatch(history[1].actor)
    only = await operator.ListAliasHistory(
        pb.ListAliasHistoryRequest(model=MODEL, kind=registry_pb2.ALIAS_MOVE_KIND_CANARY_ROLLBACK)
    )
    assert [e.request_id for e in only.entries] == [f"monitor-canary-{MODEL}-canary-2-1"]


async def test_an_update_mask_changes_only_what_it_names_and_a_bad_path_is_refused_precisely(
    start_registry: StartRegistry, open_stub: OpenStub
) -> None:
    registry = await start_registry()
    stub = open_stub(registry.address)
    await model_with_versions(stub, 2)
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="canary", version=2))
    await stub.SetDeployment(split_request({"production": 90, "canary": 10}))
    shadow = await stub.SetDeployment(
        pb.SetDeploymentRequest(
            model=MODEL,
            deployment=registry_pb2.Deployment(shadow_alias="canary", shadow_fraction=0.2),
            update_mask=field_mask_pb2.FieldMask(paths=["shadow_alias", "shadow_fraction"]),
        )
    )
    assert dict(shadow.deployment.traffic_split) == {"production": 90, "canary": 10}  # the split is kept
    assert (shadow.deployment.shadow_alias, shadow.deployment.shadow_fraction) == (
        "canary",
        pytest.approx(0.2),
    )
    audit = (
        await stub.ListAuditEntries(pb.ListAuditEntriesRequest(method="SetDeployment", page_size=1))
    ).entries
    assert audit[0].message.startswith(
        'shadow_alias "" -> "canary"; shadow_fraction 0 -> 0.2; placed versions'
    )

    for paths, says in (
        (["traffic_splits"], "'traffic_splits', not a Deployment field"),
        (["epoch"], "output only"),
        (["traffic_split.canary"], "sub-path"),
    ):
        err = await failure(
            stub.SetDeployment(
                pb.SetDeploymentRequest(
                    model=MODEL,
                    deployment=registry_pb2.Deployment(),
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                )
            )
        )
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_field(err) == "update_mask"
        details = err.details() or ""
        assert says in details and "pinned_versions, replicas, device, precision" in details, details
    # Without a mask (or with "*"), the whole deployment is replaced, as before the mask.
    whole = await stub.SetDeployment(
        pb.SetDeploymentRequest(model=MODEL, deployment=registry_pb2.Deployment(replicas=1))
    )
    assert (dict(whole.deployment.traffic_split), whole.deployment.shadow_alias) == ({}, "")
    again = await stub.SetDeployment(
        pb.SetDeploymentRequest(
            model=MODEL,
            deployment=registry_pb2.Deployment(replicas=1),
            update_mask=field_mask_pb2.FieldMask(paths=["*"]),
        )
    )
    last = (
        await stub.ListAuditEntries(pb.ListAuditEntriesRequest(method="SetDeployment", page_size=1))
    ).entries
    assert again.deployment.replicas == 1 and last[0].message.startswith("no change; placed versions")

    # A SetAlias may say it is a rollback or a canary decision, never a promote.
    err = await failure(
        stub.SetAlias(
            pb.SetAliasRequest(
                model=MODEL, alias="production", version=2, kind=registry_pb2.ALIAS_MOVE_KIND_PROMOTE
            )
        )
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_field(err) == "kind"


# -- access control on ----------------------------------------------------------------------


async def test_with_access_on_the_monitor_demo_and_load_tests_act_under_their_own_principals(
    start_registry: StartRegistry, open_stub: OpenStub, tmp_path: Path
) -> None:
    _, admin_token = new_key_token()
    registry = await start_registry(
        access=AccessSettings(mode="enforce", service_secret_file=_secret(tmp_path)), admin_key=admin_token
    )
    assert registry.keys is not None
    _, alice_token = await registry.keys.create("alice", ["registry.write:*", "alias.move:*", "deploy:*"])
    tokens = ServiceTokens(SECRET)
    admin = open_stub(registry.address, token=admin_token, client="cli")
    monitor = open_stub(registry.address, token=tokens.token("monitor"), client="monitor")
    demo = open_stub(registry.address, token=tool_token(tmp_path / "cluster.secret", "demo"), client="demo")
    load_test = open_stub(
        registry.address, token=tool_token(tmp_path / "cluster.secret", "load-test"), client="load-test"
    )
    # Alice claims to be the monitor in her user-agent: with access on, claims are not read.
    alice = open_stub(registry.address, token=alice_token, client="monitor")

    await model_with_versions(demo, 2)
    await demo.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    await load_test.SetAlias(pb.SetAliasRequest(model=MODEL, alias="canary", version=2))
    await alice.SetDeployment(split_request({"production": 50, "canary": 50}))
    await monitor.SetDeployment(split_request({"production": 90, "canary": 10}, request_id="monitor-step"))
    await monitor.SetAlias(
        pb.SetAliasRequest(
            model=MODEL,
            alias="production",
            version=2,
            expected_version=1,
            kind=registry_pb2.ALIAS_MOVE_KIND_CANARY_PROMOTE,
            request_id="monitor-promote",
        )
    )
    await load_test.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"))

    async def actors(**where: str) -> list[tuple[str, str]]:
        entries = (await admin.ListAuditEntries(pb.ListAuditEntriesRequest(model=MODEL, **where))).entries
        return [(e.actor, e.method) for e in entries]

    assert await actors(actor="monitor") == [
        ("service:monitor", "SetAlias"),
        ("service:monitor", "SetDeployment"),
    ]
    assert await actors(actor="service:monitor") == await actors(actor="monitor")
    assert await actors(actor="demo") == [
        ("service:demo", "SetAlias"),
        ("service:demo", "UploadModelVersion"),
        ("service:demo", "UploadModelVersion"),
        ("service:demo", "CreateModel"),
    ]
    assert await actors(actor="load-test") == [
        ("service:load-test", "RollbackAlias"),
        ("service:load-test", "SetAlias"),
    ]
    assert await actors(actor="alice") == [("key:alice", "SetDeployment")]

    history = (await admin.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL))).entries
    assert [(e.actor, e.kind) for e in history] == [
        ("service:load-test", registry_pb2.ALIAS_MOVE_KIND_ROLLBACK),
        ("service:monitor", registry_pb2.ALIAS_MOVE_KIND_CANARY_PROMOTE),
        ("service:load-test", registry_pb2.ALIAS_MOVE_KIND_SET),
        ("service:demo", registry_pb2.ALIAS_MOVE_KIND_SET),
    ]


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_bytes(SECRET)
    return path

"""Two writers of one deployment, on a real registry and Redis: SetDeployment's compare-and-set
on the routing epoch refuses a stale write with ABORTED and changes nothing; the monitor's
traffic-split write loses to an operator's change that lands between its read and its write;
and a monitor that restarts mid-walk resumes the canary at the step the split shows instead of
cutting the canary's traffic back to the first step."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelyard.v1 import registry_service_pb2 as reg
from monitor_service.app import MonitorApp
from monitor_service.canary import CanaryAction, CanaryDecision, CanarySettings, StaleState
from tests.integration import test_monitor_analysis as cluster
from tests.integration.test_monitor_analysis import StartMonitor, publish, set_alias, until

pytestmark = pytest.mark.integration

registry_stub = cluster.registry_stub
start_monitor = cluster.start_monitor


async def two_versions(registry_stub: Any, model: str) -> None:
    torch.manual_seed(0)
    await publish(registry_stub, model, torch.nn.Linear(4, 2), create=True)
    await publish(registry_stub, model, torch.nn.Linear(4, 2), create=False)
    await set_alias(registry_stub, model, "production", 1)
    await set_alias(registry_stub, model, "canary", 2)


async def deployment_of(registry_stub: Any, model: str) -> Any:
    return (await registry_stub.GetDeployment(reg.GetDeploymentRequest(model=model))).deployment


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, err.details()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {err}")


async def test_a_set_alias_with_a_stale_epoch_is_aborted_and_moves_nothing(registry_stub: Any) -> None:
    """SetAlias's expected_epoch: the monitor moves an alias only if nothing about the model's
    routing (an operator's split, another alias) changed since it judged."""
    await two_versions(registry_stub, "cas-alias")
    judged = (await deployment_of(registry_stub, "cas-alias")).epoch
    operator = await deployment_of(registry_stub, "cas-alias")
    operator.traffic_split.update({"production": 80, "canary": 20})
    await registry_stub.SetDeployment(reg.SetDeploymentRequest(model="cas-alias", deployment=operator))

    move = reg.SetAliasRequest(model="cas-alias", alias="canary", version=1, expected_epoch=judged)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.SetAlias(move)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    info = error_info(caught.value)
    assert info.reason == "CONFLICT" and info.metadata["epoch"] == str(judged + 1)
    model = (await registry_stub.GetModel(reg.GetModelRequest(name="cas-alias"))).model
    assert {a.name: a.version for a in model.aliases}["canary"] == 2

    move.expected_epoch = judged + 1
    moved = await registry_stub.SetAlias(move)
    assert moved.previous_version == 2 and moved.epoch == judged + 2

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.SetAlias(
            reg.SetAliasRequest(model="cas-alias", alias="canary", version=2, expected_epoch=-3)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_set_deployment_with_a_stale_epoch_is_aborted_and_changes_nothing(registry_stub: Any) -> None:
    await two_versions(registry_stub, "cas")
    read = await deployment_of(registry_stub, "cas")
    read.replicas = 1
    written = (
        await registry_stub.SetDeployment(
            reg.SetDeploymentRequest(model="cas", deployment=read, expected_epoch=read.epoch)
        )
    ).deployment
    assert written.replicas == 1 and written.epoch > read.epoch

    stale = reg.SetDeploymentRequest(model="cas", deployment=read, expected_epoch=read.epoch)
    stale.deployment.replicas = 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.SetDeployment(stale)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert "GetDeployment" in (caught.value.details() or "")
    info = error_info(caught.value)
    assert info.reason == "CONFLICT" and info.metadata["epoch"] == str(written.epoch)
    now = await deployment_of(registry_stub, "cas")
    assert now.replicas == 1 and now.epoch == written.epoch

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.SetDeployment(
            reg.SetDeploymentRequest(model="cas", deployment=read, expected_epoch=-1)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # 0 means no check: the last writer wins, as before.
    unchecked = reg.SetDeploymentRequest(model="cas", deployment=read)
    unchecked.deployment.replicas = 3
    assert (await registry_stub.SetDeployment(unchecked)).deployment.replicas == 3


class OperatorFirst(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lands an operator's change (replicas = 1) right before the first SetDeployment that
    goes through this channel: the race, made to happen every time."""

    def __init__(self, operator: Any, model: str) -> None:
        self._operator = operator
        self._model = model
        self.raced = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/SetDeployment") and not self.raced:
            self.raced += 1
            current = await deployment_of(self._operator, self._model)
            current.replicas = 1
            await self._operator.SetDeployment(
                reg.SetDeploymentRequest(model=self._model, deployment=current)
            )
        return await continuation(details, request)


async def test_the_monitors_split_write_loses_to_an_operators_change_made_between_its_read_and_write(
    registry: Any, registry_stub: Any, start_monitor: StartMonitor
) -> None:
    """The monitor writes only onto the state it judged: a change landing between its read
    and its write makes the write fail (StaleState, from ABORTED), and nothing is overwritten;
    its next round judges the new state."""
    await two_versions(registry_stub, "race")
    monitor = await start_monitor(canary=CanarySettings(enabled=False))
    await until(
        monitor,
        lambda: any(s.kind == "registry" for s in monitor.collector.services),
        timeout_s=10,
        what="the monitor to see the registry",
    )
    judged = (await deployment_of(registry_stub, "race")).epoch
    race = OperatorFirst(registry_stub, "race")
    channel = grpc.aio.insecure_channel(registry.address, interceptors=[race])
    monitor.registry._channels[registry.address] = channel  # closed by the monitor

    with pytest.raises(StaleState):
        await monitor.registry.set_split(
            "race", {"production": 75, "canary": 25}, expected_epoch=judged, request_id="split-under-race"
        )

    assert race.raced == 1
    now = await deployment_of(registry_stub, "race")
    assert now.replicas == 1 and dict(now.traffic_split) == {}, "the operator's change was overwritten"
    audit = await registry_stub.ListAuditEntries(reg.ListAuditEntriesRequest(model="race"))
    assert [e.outcome for e in audit.entries if e.request_id == "split-under-race"] == ["ABORTED"]
    # And on the state as it is now, the write goes through.
    epoch = await monitor.registry.set_split(
        "race", {"production": 75, "canary": 25}, expected_epoch=now.epoch, request_id="split-again"
    )
    assert epoch == now.epoch + 1


async def monitor_finding(
    registry_stub: Any, start_monitor: StartMonitor, model: str, split: dict[str, int]
) -> tuple[MonitorApp, CanaryDecision]:
    """A stepwise monitor started on a canary whose deployment already has `split` (as a
    monitor before it left it), and its first decision."""
    await two_versions(registry_stub, model)
    found = await deployment_of(registry_stub, model)
    found.traffic_split.update(split)
    await registry_stub.SetDeployment(reg.SetDeploymentRequest(model=model, deployment=found))
    monitor = await start_monitor(
        canary=CanarySettings(promote_steps=[0.25, 0.5, 1.0], step_after_s=600, min_requests=10)
    )
    await until(monitor, lambda: bool(monitor.canary.decisions), timeout_s=10, what="a canary decision")
    return monitor, monitor.canary.decisions[0]


async def test_a_restarted_monitor_resumes_the_canary_at_the_step_the_split_shows(
    registry_stub: Any, start_monitor: StartMonitor
) -> None:
    walked = {"production": 50, "canary": 50}
    monitor, decision = await monitor_finding(registry_stub, start_monitor, "resume", walked)

    assert decision.action is CanaryAction.STEP and decision.traffic_fraction == 0.5
    assert "resumed at step 2 of 3" in decision.reason
    await monitor.wait_rounds(3)
    assert len(monitor.canary.decisions) == 1
    assert dict((await deployment_of(registry_stub, "resume")).traffic_split) == walked


async def test_a_split_that_matches_no_step_starts_the_walk_at_the_first_step(
    registry_stub: Any, start_monitor: StartMonitor
) -> None:
    odd = {"production": 70, "canary": 30}
    _, decision = await monitor_finding(registry_stub, start_monitor, "restart", odd)

    assert decision.action is CanaryAction.STEP and decision.traffic_fraction == 0.25
    assert "resumed" not in decision.reason
    assert dict((await deployment_of(registry_stub, "restart")).traffic_split) == {
        "production": 75,
        "canary": 25,
    }

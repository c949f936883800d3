"""The canary walk's lifecycle on a real cluster (Redis, registry, model server, gateway,
monitor, all on port 0) under real traffic, the issue's cases replayed:

- after an automated promotion, an operator who rolls production back (and promotes the old
  version again) is not undone: the abandoned version gets no split and no traffic share;
- an operator's move of the canary alias mid-walk ends the walk (an END decision), and the
  monitor writes nothing more for the old version;
- a rollback without steps clears the split the operator gave the canary, so the next canary
  does not start at that share with no ramp.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from modelyard.v1 import registry_service_pb2 as reg
from monitor_service.canary import CanaryAction
from tests.integration import test_monitor_analysis as cluster
from tests.integration.test_monitor_analysis import (
    POISONED,
    Flaky,
    StartMonitor,
    aliases_of,
    good,
    predict,
    publish,
    set_alias,
    until,
    until_served,
)
from tests.integration.test_monitor_baseline_steps import STEPS, split_of, stepped_canary

pytestmark = pytest.mark.integration

registry_stub = cluster.registry_stub
model_server = cluster.model_server
gateway = cluster.gateway
start_monitor = cluster.start_monitor


def actions(monitor: Any) -> list[str]:
    return [d.action.value for d in reversed(monitor.canary.decisions)]


async def monitor_writes(registry_stub: Any, model: str) -> list[str]:
    """The request ids of the monitor's writes, from the registry's audit log."""
    audit = await registry_stub.ListAuditEntries(reg.ListAuditEntriesRequest(model=model))
    return [e.request_id for e in audit.entries if e.request_id.startswith("monitor-canary-")]


async def test_an_operators_rollback_after_a_promotion_is_not_undone(
    registry_stub: Any, gateway: Any, start_monitor: StartMonitor
) -> None:
    monitor, stable, canary, sender = await stepped_canary(registry_stub, gateway, start_monitor, "undo", 0.0)
    try:
        await until(
            monitor,
            lambda: CanaryAction.PROMOTE in [d.action for d in monitor.canary.decisions],
            timeout_s=30,
            what="the canary's promotion",
        )
        assert await aliases_of(registry_stub, "undo") == {"production": canary, "canary": canary}
        writes = await monitor_writes(registry_stub, "undo")

        # The operator is not convinced: `modelyard alias rollback undo production`.
        await registry_stub.RollbackAlias(reg.RollbackAliasRequest(model="undo", alias="production"))
        await monitor.wait_rounds(20)  # 4 s: far beyond the 0.5 s a step takes
        await registry_stub.PromoteVersion(
            reg.PromoteVersionRequest(model="undo", alias="production", version=stable)
        )
        await monitor.wait_rounds(20)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    assert await aliases_of(registry_stub, "undo") == {"production": stable, "canary": canary}
    assert await split_of(registry_stub, "undo") == {}, "the abandoned version got a share of traffic"
    assert await monitor_writes(registry_stub, "undo") == writes
    assert actions(monitor)[-1] == "promote"


async def test_an_operator_moving_the_canary_mid_walk_ends_it(
    registry_stub: Any, gateway: Any, start_monitor: StartMonitor
) -> None:
    monitor, stable, canary, sender = await stepped_canary(
        registry_stub, gateway, start_monitor, "takeover", 0.0, step_after_s=600.0
    )
    try:
        await until(
            monitor,
            lambda: CanaryAction.STEP in [d.action for d in monitor.canary.decisions],
            timeout_s=20,
            what="the first step",
        )
        writes = await monitor_writes(registry_stub, "takeover")
        await set_alias(registry_stub, "takeover", "canary", stable)  # the operator calls it off
        await until(
            monitor,
            lambda: CanaryAction.END in [d.action for d in monitor.canary.decisions],
            timeout_s=10,
            what="the end of the walk",
        )
        await monitor.wait_rounds(10)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    end = next(d for d in monitor.canary.decisions if d.action is CanaryAction.END)
    assert f"canary moved from v{canary} to v{stable}" in end.reason
    assert await monitor_writes(registry_stub, "takeover") == writes  # nothing more
    assert await split_of(registry_stub, "takeover") == {
        "production": 75,
        "canary": 25,
    }  # as the operator left it


async def test_a_rollback_without_steps_clears_the_split_the_operator_gave_the_canary(
    registry_stub: Any, gateway: Any, start_monitor: StartMonitor
) -> None:
    model = "nosteps"
    stable = await publish(registry_stub, model, Flaky(fail=False), create=True)
    canary = await publish(registry_stub, model, Flaky(fail=True), create=False)
    await set_alias(registry_stub, model, "production", stable)
    deployment = (await registry_stub.GetDeployment(reg.GetDeploymentRequest(model=model))).deployment
    deployment.traffic_split.update({"production": 80, "canary": 20})
    await set_alias(registry_stub, model, "canary", stable)
    await registry_stub.SetDeployment(reg.SetDeploymentRequest(model=model, deployment=deployment))
    monitor = await start_monitor(canary=STEPS.model_copy(update={"promote_steps": []}))
    await monitor.wait_rounds(2)
    await set_alias(registry_stub, model, "canary", canary)  # the operator starts the canary
    await until_served(gateway, model, ["canary"])
    rng = random.Random(9)

    async def traffic() -> None:
        while True:
            await predict(gateway, model, "", POISONED if rng.random() < 0.2 else good(rng))

    sender = asyncio.create_task(traffic())
    try:
        await until(
            monitor,
            lambda: CanaryAction.ROLLBACK in [d.action for d in monitor.canary.decisions],
            timeout_s=30,
            what="the canary's rollback",
        )
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    assert actions(monitor) == ["start", "rollback"]
    assert await aliases_of(registry_stub, model) == {"production": stable, "canary": stable}
    assert await split_of(registry_stub, model) == {}
    assert "traffic split cleared" in monitor.canary.decisions[0].reason

"""Preferred batch sizes and execution from a deployment to the batcher: mapped over the
server's defaults (which give way where they conflict), a deployment the server cannot serve
fails only its own versions' loads, and the server-wide settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from model_server.batching import BatchConfig
from model_server.devices import ServingConfig
from model_server.placement import ServingError, desired_versions, serving_config
from model_server.reconciler import Backoff, Reconciler
from model_server.repository import ModelRepository, VersionState
from model_server.settings import ModelServerSettings
from modelyard.coordination import Deployment, Event, ServiceRecord
from modelyard.errors import FailedPrecondition
from modelyard.settings import SettingsError, load_settings
from tests.unit.model_server.model_artifacts import MemorySource, make_artifact, mlp, torchscript_bytes

DEFAULTS = ServingConfig(batch=BatchConfig(max_batch_size=64))


# -- serving_config -------------------------------------------------------------------------


def test_the_deployments_sizes_and_execution_reach_the_batch_config() -> None:
    batch = serving_config(
        Deployment(max_batch_size=32, preferred_batch_sizes=[32, 8, 16, 8], execution="thread"), DEFAULTS
    ).batch
    assert (batch.max_batch_size, batch.preferred_batch_sizes, batch.execution) == (32, (8, 16, 32), "thread")


def test_unset_fields_keep_the_servers_defaults() -> None:
    defaults = ServingConfig(
        batch=BatchConfig(max_batch_size=64, preferred_batch_sizes=(16, 32), execution="thread")
    )
    batch = serving_config(Deployment(max_queue_size=10), defaults).batch
    assert (batch.preferred_batch_sizes, batch.execution, batch.max_queue_size) == ((16, 32), "thread", 10)


def test_default_sizes_above_the_deployments_max_batch_size_are_left_out() -> None:
    defaults = ServingConfig(batch=BatchConfig(max_batch_size=64, preferred_batch_sizes=(8, 16, 32)))
    assert serving_config(Deployment(max_batch_size=16), defaults).batch.preferred_batch_sizes == (8, 16)


def test_the_deployments_sizes_above_the_servers_max_batch_size_are_refused_with_the_reason() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        serving_config(Deployment(preferred_batch_sizes=[8, 128]), DEFAULTS)
    assert "[128] exceed max_batch_size 64 (this model server's default)" in caught.value.message
    # With its own max_batch_size the same sizes are fine.
    batch = serving_config(Deployment(max_batch_size=128, preferred_batch_sizes=[8, 128]), DEFAULTS).batch
    assert batch.preferred_batch_sizes == (8, 128)


def test_loop_and_instances_default_gives_way() -> None:
    four = ServingConfig(batch=BatchConfig(instances=4))
    # The deployment asks for the loop: one batch at a time, whatever the server's default.
    batch = serving_config(Deployment(execution="loop"), four).batch
    assert (batch.execution, batch.instances) == ("loop", 1)
    # The server's default is the loop, the deployment wants several instances: auto.
    loop = ServingConfig(batch=BatchConfig(execution="loop"))
    batch = serving_config(Deployment(instances=2), loop).batch
    assert (batch.execution, batch.instances) == ("auto", 2)


def test_a_value_that_skipped_the_registry_is_a_failed_precondition_not_a_crash() -> None:
    with pytest.raises(FailedPrecondition, match="execution 'warp'"):
        serving_config(Deployment(execution="warp"), DEFAULTS)
    with pytest.raises(FailedPrecondition, match="instances must be 1"):
        serving_config(Deployment(execution="loop", instances=3), DEFAULTS)


def test_desired_versions_gives_the_reason_for_the_unservable_model_only() -> None:
    aliases = {"good": ({"production": 1}, 1), "bad": ({"production": 2}, 1)}
    deployments = {
        "good": Deployment(preferred_batch_sizes=[4]),
        "bad": Deployment(preferred_batch_sizes=[100]),
    }
    desired = desired_versions(aliases, deployments, server_id="ms", live_servers=[], defaults=DEFAULTS)
    good, bad = desired[("good", 1)], desired[("bad", 2)]
    assert isinstance(good, ServingConfig) and good.batch.preferred_batch_sizes == (4,)
    assert isinstance(bad, ServingError) and "model 'bad' version 2" in bad.message
    # A value: an unchanged bad deployment gives an equal error.
    again = desired_versions(aliases, deployments, server_id="ms", live_servers=[], defaults=DEFAULTS)
    assert again[("bad", 2)] == bad


# -- the reconciler -------------------------------------------------------------------------


class Aliases:
    """Aliases and deployments in dicts, shaped like CoordinationStore (no membership)."""

    def __init__(self) -> None:
        self.aliases: dict[str, dict[str, int]] = {}
        self.deployments: dict[str, Deployment] = {}

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        return {model: (dict(pointers), 1) for model, pointers in self.aliases.items()}

    async def all_deployments(self) -> dict[str, Deployment]:
        return dict(self.deployments)

    async def list_services(self) -> list[ServiceRecord]:
        return []

    async def events(self) -> AsyncIterator[Event]:
        for event in ():  # none: these tests call reconcile_once themselves
            yield event


async def eventually(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Wait for loads (on worker threads) to show; the interval is not what is tested."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        assert loop.time() < end, "condition never held"
        await asyncio.sleep(0.005)


async def test_an_unservable_deployment_fails_its_model_only_and_a_serving_copy_stays(
    source: MemorySource, caplog: pytest.LogCaptureFixture
) -> None:
    for model in ("good", "bad"):
        source.add(make_artifact(torchscript_bytes(mlp()), model=model, version=1))
    store = Aliases()
    store.aliases = {"good": {"production": 1}, "bad": {"production": 1}}
    store.deployments = {
        "good": Deployment(preferred_batch_sizes=[2], execution="thread"),
        "bad": Deployment(preferred_batch_sizes=[8]),  # the server's max_batch_size is 4
    }
    repository = ModelRepository(source, BatchConfig(max_batch_size=4))
    reconciler = Reconciler(store, repository, interval_s=3600, backoff=Backoff(base_s=10, cap_s=10))
    try:
        with caplog.at_level(logging.WARNING, logger="model_server.reconciler"):
            await reconciler.reconcile_once()  # must not raise
            await eventually(lambda: (v := repository.get("good", 1)) and v.state is VersionState.READY)
            await eventually(lambda: not reconciler._loading)  # noqa: SLF001 - the failure is recorded
        good = repository.get("good", 1)
        assert good is not None and good.batcher is not None
        assert (good.serving.batch.preferred_batch_sizes, good.batcher.execution) == ((2,), "thread")
        bad = repository.get("bad", 1)  # held as failed, with the reason, and never fetched
        assert bad is not None and bad.state is VersionState.FAILED and "max_batch_size" in bad.error
        assert ("bad", 1) not in source.fetches
        assert "[8] exceed max_batch_size 4 (this model server's default)" in caplog.text

        # Fixed: it loads at once (a changed deployment does not wait for the backoff).
        store.deployments["bad"] = Deployment(max_batch_size=8, preferred_batch_sizes=[8])
        await reconciler.reconcile_once()
        await eventually(lambda: (v := repository.get("bad", 1)) and v.state is VersionState.READY)
        served = repository.get("bad", 1)

        # Broken again: the copy already serving keeps serving with its settings.
        store.deployments["bad"] = Deployment(preferred_batch_sizes=[8])
        await reconciler.reconcile_once()
        await eventually(lambda: not reconciler._loading)  # noqa: SLF001
        assert repository.get("bad", 1) is served and served is not None
        assert served.state is VersionState.READY and served.serving.batch.max_batch_size == 8
    finally:
        await reconciler.aclose()
        await repository.aclose()


# -- server-wide settings -------------------------------------------------------------------


def test_server_wide_sizes_and_execution_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings(ModelServerSettings)
    assert (defaults.preferred_batch_sizes, defaults.execution) == ((), "auto")
    monkeypatch.setenv("MODELYARD_MODEL_SERVER_PREFERRED_BATCH_SIZES", "[8,16,32]")
    monkeypatch.setenv("MODELYARD_MODEL_SERVER_EXECUTION", "thread")
    settings = load_settings(ModelServerSettings)
    assert (settings.preferred_batch_sizes, settings.execution) == ((8, 16, 32), "thread")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PREFERRED_BATCH_SIZES": "[128]"}, "MODELYARD_MODEL_SERVER_PREFERRED_BATCH_SIZES"),
        ({"PREFERRED_BATCH_SIZES": "[0]"}, "MODELYARD_MODEL_SERVER_PREFERRED_BATCH_SIZES"),
        ({"EXECUTION": "fast"}, "MODELYARD_MODEL_SERVER_EXECUTION"),
        ({"EXECUTION": "loop", "INSTANCES": "2"}, "MODELYARD_MODEL_SERVER_EXECUTION"),
    ],
)
def test_bad_server_wide_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"MODELYARD_MODEL_SERVER_{name}", value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(ModelServerSettings)


async def test_a_version_whose_deployment_cannot_be_served_shows_as_failed() -> None:
    from model_server.batching import BatchConfig as _BatchConfig
    from model_server.repository import ModelRepository, VersionState

    class NoSource:
        async def fetch(self, model: str, version: int) -> None:
            raise AssertionError("fail() must not fetch")

    changes: list[int] = []
    repository = ModelRepository(NoSource(), _BatchConfig(), on_change=lambda: changes.append(1))  # type: ignore[arg-type]
    repository.fail("m", 1, "preferred_batch_sizes [16] exceed max_batch_size 8")
    held = repository.get("m", 1)
    assert held is not None and held.state is VersionState.FAILED and "16" in held.error
    assert [r.state for r in repository.records()] == ["failed"] and changes
    await repository.aclose()

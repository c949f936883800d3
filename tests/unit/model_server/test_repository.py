"""ModelRepository on real TorchScript / torch.export bytes through an in-memory source."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from model_server.batching import BatchConfig
from model_server.dataplane import ModelServerDataPlane
from model_server.repository import ModelRepository, VersionState
from model_server.stats import RequestStats
from modelyard.errors import (
    ArtifactCorrupt,
    FailedPrecondition,
    InvalidArgument,
    SignatureMismatch,
    VersionNotReady,
)
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.validation import WireTensor
from tests.unit.model_server.model_artifacts import (
    FP32,
    MemorySource,
    TwoHeads,
    export_bytes,
    infer_wire,
    make_artifact,
    make_signature,
    mlp,
    torchscript_bytes,
    until,
)


@pytest.fixture
async def repository(source: MemorySource) -> AsyncIterator[ModelRepository]:
    changes: list[int] = []
    repo = ModelRepository(source, BatchConfig(max_batch_size=8), on_change=lambda: changes.append(1))
    yield repo
    await repo.aclose()


def wire(name: str, tensor: torch.Tensor) -> tensor_pb2.Tensor:
    return tensor_to_proto(name, tensor)


async def test_a_loaded_version_answers_like_in_process_torch(
    source: MemorySource, repository: ModelRepository
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    loaded = await repository.load("mlp", 1)
    assert loaded.state is VersionState.READY and loaded.platform == "torchscript"

    x = torch.randn(5, 4)
    outputs, timing = await infer_wire(repository, "mlp", 1, [wire("input", x)], [], None)
    assert [o.name for o in outputs] == ["output"]
    with torch.inference_mode():
        expected = mlp()(x)
    torch.testing.assert_close(tensor_from_proto(outputs[0]), expected, rtol=1e-5, atol=1e-6)
    assert timing.batch_size == 5


async def test_a_torch_export_archive_loads_and_answers(
    source: MemorySource, repository: ModelRepository
) -> None:
    data = export_bytes(mlp(), torch.zeros(2, 4))
    source.add(make_artifact(data, format=registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT))
    loaded = await repository.load("mlp", 1)
    assert loaded.platform == "torch_export"
    x = torch.randn(3, 4)
    outputs, _ = await infer_wire(repository, "mlp", 1, [wire("input", x)], [], None)
    with torch.inference_mode():
        torch.testing.assert_close(tensor_from_proto(outputs[0]), mlp()(x), rtol=1e-5, atol=1e-6)


async def test_outputs_are_named_and_filtered(source: MemorySource, repository: ModelRepository) -> None:
    signature = make_signature(
        outputs=(("scores", FP32, (-1, 3)), ("label", tensor_pb2.DATA_TYPE_INT64, (-1,)))
    )
    source.add(make_artifact(torchscript_bytes(TwoHeads()), signature=signature))
    await repository.load("mlp", 1)
    x = [wire("input", torch.randn(2, 4))]

    everything, _ = await infer_wire(repository, "mlp", 1, x, [], None)
    assert [o.name for o in everything] == ["scores", "label"]
    only_label, _ = await infer_wire(repository, "mlp", 1, x, ["label"], None)
    assert [o.name for o in only_label] == ["label"]
    assert tensor_from_proto(only_label[0]).dtype == torch.int64
    with pytest.raises(InvalidArgument) as caught:
        await infer_wire(repository, "mlp", 1, x, ["logits"], None)
    assert caught.value.field == "output_names"


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        pytest.param([wire("inptu", torch.zeros(1, 4))], "inputs[inptu]", id="unknown-name"),
        pytest.param([], "inputs[input]", id="missing"),
        pytest.param([wire("input", torch.zeros(1, 4))] * 2, "inputs[input]", id="repeated"),
        pytest.param(
            [wire("input", torch.zeros(1, 4, dtype=torch.float64))], "inputs[input].data_type", id="dtype"
        ),
        pytest.param([wire("input", torch.zeros(1, 5))], "inputs[input].shape", id="shape"),
        pytest.param([wire("input", torch.zeros(4))], "inputs[input].shape", id="rank"),
    ],
)
async def test_inputs_are_checked_against_the_signature(
    source: MemorySource, repository: ModelRepository, inputs: list[tensor_pb2.Tensor], field: str
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    await repository.load("mlp", 1)
    with pytest.raises(SignatureMismatch) as caught:
        await infer_wire(repository, "mlp", 1, inputs, [], None)
    assert caught.value.field == field


async def test_a_version_not_held_is_not_ready_and_the_message_says_what_is(
    source: MemorySource, repository: ModelRepository
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    await repository.load("mlp", 1)
    with pytest.raises(VersionNotReady, match="ready here: mlp v1"):
        await infer_wire(repository, "mlp", 2, [wire("input", torch.zeros(1, 4))], [], None)


async def test_a_corrupt_artifact_is_refused_before_loading_and_stays_failed(
    source: MemorySource, repository: ModelRepository
) -> None:
    good = torchscript_bytes(mlp())
    source.add(make_artifact(good[:-10] + b"x" * 10, sha256=make_artifact(good).sha256))
    with pytest.raises(ArtifactCorrupt):
        await repository.load("mlp", 1)
    failed = repository.get("mlp", 1)
    assert failed is not None and failed.state is VersionState.FAILED
    assert "sha256" in failed.error and failed.record().state == "failed"
    with pytest.raises(VersionNotReady, match="failed"):
        await infer_wire(repository, "mlp", 1, [wire("input", torch.zeros(1, 4))], [], None)

    source.add(make_artifact(good))  # the registry's copy is repaired: a retry succeeds
    assert (await repository.load("mlp", 1)).state is VersionState.READY


async def test_a_model_that_contradicts_its_signature_never_becomes_ready(
    source: MemorySource, repository: ModelRepository
) -> None:
    signature = make_signature(outputs=(("a", FP32, (-1, 3)), ("b", FP32, (-1, 3))))
    source.add(make_artifact(torchscript_bytes(mlp()), signature=signature))
    with pytest.raises(FailedPrecondition, match="returns 1 outputs"):
        await repository.load("mlp", 1)

    source.add(
        make_artifact(
            torchscript_bytes(mlp()), version=2, signature=make_signature(outputs=(("y", FP32, (-1, 5)),))
        )
    )
    with pytest.raises(FailedPrecondition, match="shape"):
        await repository.load("mlp", 2)


async def test_concurrent_loads_of_one_version_share_one_fetch(
    source: MemorySource, repository: ModelRepository
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    source.gate = asyncio.Event()
    loads = [asyncio.create_task(repository.load("mlp", 1)) for _ in range(3)]
    await until(lambda: source.fetches)
    source.gate.set()
    results = await asyncio.gather(*loads)
    assert len({id(r) for r in results}) == 1
    assert source.fetches == [("mlp", 1)]


async def test_unload_drops_every_reference_to_the_module(
    source: MemorySource, repository: ModelRepository
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    loaded = await repository.load("mlp", 1)
    await infer_wire(repository, "mlp", 1, [wire("input", torch.zeros(2, 4))], [], None)
    module_ref = weakref.ref(loaded.module)
    del loaded

    await repository.unload("mlp", 1)
    gc.collect()
    assert repository.get("mlp", 1) is None
    assert module_ref() is None, "the unloaded module is still referenced"


async def test_an_unloaded_versions_series_leave_metrics_and_the_others_stay(source: MemorySource) -> None:
    stats = RequestStats(input_sample_every=1)
    repository = ModelRepository(source, BatchConfig(max_batch_size=8), on_unloaded=stats.forget)
    dataplane = ModelServerDataPlane(repository, stats)
    try:
        for version in (1, 2):
            source.add(make_artifact(torchscript_bytes(mlp()), model="forgotten", version=version))
            await repository.load("forgotten", version)
            await dataplane.infer(
                "forgotten", version, [WireTensor.of(wire("input", torch.zeros(2, 4)))], [], None
            )

        def series(version: int) -> dict[str, float | None]:
            labels = {"model": "forgotten", "version": str(version)}
            return {
                "requests": REGISTRY.get_sample_value(
                    "modelyard_model_server_requests_total", {**labels, "code": "OK"}
                ),
                "latency": REGISTRY.get_sample_value("modelyard_model_server_request_seconds_count", labels),
                "sampled": REGISTRY.get_sample_value(
                    "modelyard_model_server_input_sampled_items_total", {**labels, "input": "input"}
                ),
            }

        assert series(1) == {"requests": 1.0, "latency": 1.0, "sampled": 2.0}
        await repository.unload("forgotten", 1)
        assert series(1) == {"requests": None, "latency": None, "sampled": None}
        assert series(2) == {"requests": 1.0, "latency": 1.0, "sampled": 2.0}

        # Loaded again, it counts afresh (no cached series left detached).
        await repository.load("forgotten", 1)
        await dataplane.infer("forgotten", 1, [WireTensor.of(wire("input", torch.zeros(3, 4)))], [], None)
        assert series(1) == {"requests": 1.0, "latency": 1.0, "sampled": 3.0}
    finally:
        await repository.aclose()


async def test_unload_during_a_load_cancels_it(source: MemorySource, repository: ModelRepository) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    source.gate = asyncio.Event()
    load = asyncio.create_task(repository.load("mlp", 1))
    await until(lambda: source.fetches)
    assert repository.get("mlp", 1) is not None
    await repository.unload("mlp", 1)
    with pytest.raises(asyncio.CancelledError):
        await load
    assert repository.get("mlp", 1) is None


async def test_records_report_state_signature_and_platform(
    source: MemorySource, repository: ModelRepository
) -> None:
    source.add(make_artifact(torchscript_bytes(mlp())))
    await repository.load("mlp", 1)
    (record,) = repository.records()
    assert (record.model, record.version, record.state, record.platform) == ("mlp", 1, "ready", "torchscript")
    assert record.signature["inputs"][0]["name"] == "input"


def test_a_torch_export_archive_moves_to_a_device_other_than_cpu(tmp_path: Path) -> None:
    # In a fresh interpreter, as a model server starts: `import torch` alone does not load
    # torch.export.passes, which the move needs. "meta" stands in for a GPU on this machine.
    archive = tmp_path / "mlp.pt2"
    archive.write_bytes(export_bytes(mlp(), torch.zeros(2, 4)))
    script = (
        "import sys\n"
        "from model_server.loader import _load_torch_export\n"
        "module = _load_torch_export(open(sys.argv[1], 'rb').read(), 'meta')\n"
        "print(sorted({p.device.type for p in module.parameters()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(archive)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['meta']"
